//! The EC2 side of simulated nodes: one VPC and subnet in moto per
//! environment, and one instance per [`super::SimNode`].

use super::{Error, Result};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use std::net::Ipv4Addr;

/// CIDR of the VPC and its one subnet; simulated hosts take their IPv4
/// addresses from it (198.18.0.0/15 is the benchmarking range, RFC 2544).
pub const VPC_CIDR: &str = "198.18.0.0/16";
/// The availability zone of the subnet (and every simulated instance).
pub const AVAILABILITY_ZONE: &str = "us-east-1a";
/// Tag key set on everything the environment creates in moto.
pub(crate) const TAG_KEY: &str = "palisade.dev/testenv";

/// The VPC, subnet and machine image simulated nodes' instances use.
#[derive(Clone, Debug)]
pub struct SimCloud {
    /// The VPC id.
    pub vpc_id: String,
    /// The subnet id (in [`AVAILABILITY_ZONE`], CIDR [`VPC_CIDR`]).
    pub subnet_id: String,
    /// An image id moto knows.
    pub image_id: String,
}

/// An EC2 instance created for a simulated node.
#[derive(Clone, Debug)]
pub(crate) struct SimInstance {
    pub(crate) instance_id: String,
    pub(crate) eni_id: String,
    pub(crate) availability_zone: String,
}

fn tags(resource: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .tags(Tag::builder().key("Name").value(name).build())
        .tags(Tag::builder().key(TAG_KEY).value("true").build())
        .build()
}

impl SimCloud {
    pub(crate) async fn create(ec2: aws_sdk_ec2::Client) -> Result<SimCloud> {
        let vpc = ec2
            .create_vpc()
            .cidr_block(VPC_CIDR)
            .tag_specifications(tags(ResourceType::Vpc, "palisade-testenv"))
            .send()
            .await
            .map_err(Error::ec2("CreateVpc"))?;
        let vpc_id = vpc.vpc.and_then(|v| v.vpc_id).ok_or_else(|| Error::Ec2 {
            operation: "CreateVpc",
            message: "no VPC id in the answer".into(),
        })?;
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(VPC_CIDR)
            .availability_zone(AVAILABILITY_ZONE)
            .tag_specifications(tags(ResourceType::Subnet, "palisade-testenv"))
            .send()
            .await
            .map_err(Error::ec2("CreateSubnet"))?;
        let subnet_id = subnet
            .subnet
            .and_then(|s| s.subnet_id)
            .ok_or_else(|| Error::Ec2 {
                operation: "CreateSubnet",
                message: "no subnet id in the answer".into(),
            })?;
        let images = ec2
            .describe_images()
            .owners("amazon")
            .filters(
                Filter::builder()
                    .name("architecture")
                    .values("x86_64")
                    .build(),
            )
            .send()
            .await
            .map_err(Error::ec2("DescribeImages"))?;
        let image_id = images
            .images
            .unwrap_or_default()
            .into_iter()
            .find_map(|image| image.image_id)
            .ok_or_else(|| Error::Ec2 {
                operation: "DescribeImages",
                message: "moto lists no amazon x86_64 image".into(),
            })?;
        Ok(SimCloud {
            vpc_id,
            subnet_id,
            image_id,
        })
    }

    /// Runs one instance with private IP `ip` in the subnet.
    pub(crate) async fn run_instance(
        &self,
        ec2: &aws_sdk_ec2::Client,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<SimInstance> {
        let run = ec2
            .run_instances()
            .image_id(&self.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .subnet_id(&self.subnet_id)
            .private_ip_address(ip.to_string())
            .tag_specifications(tags(ResourceType::Instance, name))
            .send()
            .await
            .map_err(Error::ec2("RunInstances"))?;
        let instance = run
            .instances
            .unwrap_or_default()
            .into_iter()
            .next()
            .ok_or_else(|| Error::Ec2 {
                operation: "RunInstances",
                message: "no instance in the answer".into(),
            })?;
        let missing = |what: &str| Error::Ec2 {
            operation: "RunInstances",
            message: format!("instance without {what}"),
        };
        let instance_id = instance
            .instance_id
            .clone()
            .ok_or_else(|| missing("an id"))?;
        let eni_id = instance
            .network_interfaces
            .unwrap_or_default()
            .into_iter()
            .find(|eni| eni.attachment.as_ref().and_then(|a| a.device_index) == Some(0))
            .and_then(|eni| eni.network_interface_id)
            .ok_or_else(|| missing("a primary network interface"))?;
        let availability_zone = instance
            .placement
            .and_then(|p| p.availability_zone)
            .unwrap_or_else(|| AVAILABILITY_ZONE.to_string());
        Ok(SimInstance {
            instance_id,
            eni_id,
            availability_zone,
        })
    }
}
